"""``xaioverlay serve``: the module's workflow as a web page, on trame-slicer.

A second face of XAIOverlay beside the Slicer module: the same MRML logic (:mod:`XAIOverlayLib`: map nodes,
colour tables, compare views, case list, map cache, worker client) runs on slicer-core behind a trame page,
and Slicer's own slice pipeline renders the views, streamed as images to the browser.

It lives in its own package, not in the engine (:mod:`xaioverlay` never imports Slicer or trame) nor in
:mod:`XAIOverlayLib` (which desktop Slicer loads, where trame is not installed); the CLI imports it only
when ``serve`` runs.

- :mod:`.access` — the access token: every page, file and websocket request must carry it
- :mod:`.page` — the page: state, controls, views, and the timer that moves the logic along
- :mod:`.serve` — the ``serve`` command's arguments and its start
"""
