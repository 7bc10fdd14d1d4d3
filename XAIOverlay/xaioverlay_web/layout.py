"""The page's layout (trame + Vuetify 3, served from the installed packages: no CDN).

Side panel: case list (previous / next, the current case highlighted), model and target, method
checkboxes, Explain and Cancel, progress. Main area: one compare view per method, threshold, opacity and
orientation, the table (one row per method; clicking a row enlarges its view). Controls carry stable
``data-testid`` attributes for tests.
"""

from __future__ import annotations

from .page import MAX_VIEWS, OverlayPage


#: What Explain, Next and Previous send with the click: the ticked methods and the target.
CHOICE = "[chosen, target]"


def testid(name: str) -> str:
    return f'data-testid="{name}"'


def build_layout(page: OverlayPage):
    from trame.ui.vuetify3 import VAppLayout
    from trame.widgets import client, html
    from trame.widgets import vuetify3 as v3

    server = page.server
    with VAppLayout(server, full_height=True) as layout:
        with v3.VNavigationDrawer(permanent=True, width=300):
            with v3.VContainer(classes="pa-3"):
                html.Div("XAIOverlay", classes="text-h6")
                html.Div("Model: {{ model_name }} ({{ task }})", classes="text-body-2 mb-2")
                html.Div("Cases", classes="text-subtitle-2")
                with v3.VList(density="compact", classes="mb-1"):
                    v3.VListItem(v_for="(name, index) in cases", key="index", title=("name",),
                                 active=("index === case_index",), color="primary",
                                 raw_attrs=[':data-testid="\'case-\' + index"'])
                with html.Div(classes="d-flex mb-3"):
                    v3.VBtn("Previous", click=(server.controller.previous_case, CHOICE), size="small", classes="mr-2",
                            disabled=("running || case_index === 0",), raw_attrs=[testid("case-previous")])
                    v3.VBtn("Next", click=(server.controller.next_case, CHOICE), size="small",
                            disabled=("running || case_index >= cases.length - 1",), raw_attrs=[testid("case-next")])
                with html.Div(v_show="similar.length", classes="mb-3", raw_attrs=[testid("similar-cases")]):
                    html.Div("Similar cases", classes="text-subtitle-2")
                    v3.VListItem(v_for="item in similar", key="item.id", title=("item.text",), density="compact",
                                 click=(server.controller.open_similar, f"[item.id, {CHOICE[1:-1]}]"),
                                 disabled=("running",), raw_attrs=[':data-testid="\'similar-\' + item.id"'])
                v3.VSelect(label="Target", v_model=("target",), items=("classes",), density="compact",
                           raw_attrs=[testid("target")])
                html.Div("Methods", classes="text-subtitle-2")
                for method in page.methods:
                    v3.VCheckbox(label=method, v_model=("chosen",), value=method, density="compact", hide_details=True,
                                 raw_attrs=[testid(f"method-{method}")])
                with html.Div(classes="d-flex my-3"):
                    v3.VBtn("Explain", click=(server.controller.explain, CHOICE), color="primary", classes="mr-2",
                            disabled=("running || !!explain_reason",), raw_attrs=[testid("explain")])
                    v3.VBtn("Cancel", click=server.controller.cancel, disabled=("!running",),
                            raw_attrs=[testid("cancel")])
                v3.VProgressLinear(model_value=("progress_value",), height=6, color="primary")
                html.Div("{{ explain_reason }}", v_show="explain_reason", classes="text-caption",
                         raw_attrs=[testid("explain-reason")])
                html.Div("{{ progress_text }}", classes="text-body-2 mt-1",
                         raw_attrs=[testid("progress"), ':data-run="run"', ':data-requests-sent="requests_sent"'])
                html.Div("{{ status_line }}", classes="text-caption", raw_attrs=[testid("status")])
                html.Div("{{ error }}", v_show="error", classes="text-caption text-error", raw_attrs=[testid("error")])
        with v3.VMain():
            with v3.VContainer(fluid=True, classes="pa-2"):
                with v3.VRow(dense=True, classes="align-center"):
                    with v3.VCol(cols=4):
                        v3.VSlider(label="Threshold (percentile)", v_model=("percentile",), min=50, max=99.9, step=0.1,
                                   density="compact", hide_details=True, raw_attrs=[testid("threshold")])
                    with v3.VCol(cols=4):
                        v3.VSlider(label="Opacity", v_model=("opacity",), min=0, max=1, step=0.05, density="compact",
                                   hide_details=True, raw_attrs=[testid("opacity")])
                    with v3.VCol(cols=4):
                        v3.VSelect(label="Orientation", v_model=("orientation",), items=("orientations",),
                                   density="compact", hide_details=True, raw_attrs=[testid("orientation")])
                with v3.VRow(dense=True):
                    for index in range(MAX_VIEWS):
                        mine = f"enlarged === slots[{index}]"
                        with v3.VCol(cols=(f"{mine} ? 12 : 6",), v_show=f"slots[{index}] && (!enlarged || {mine})"):
                            html.Div(f"{{{{ slot_labels[{index}] }}}}", classes="text-subtitle-2")
                            with html.Div(style=(f"{{height: ({mine} ? 640 : 320) + 'px', position: 'relative'}}",),
                                          raw_attrs=[f':data-testid="\'view-\' + slots[{index}]"',
                                                     f':data-xy-to-ras="slot_geometry[{index}]"']):
                                client.ServerTemplate(name=page.view_template(index))
                html.Div("Click a row to enlarge its view; click it again to compare all.", classes="text-caption")
                with v3.VTable(density="compact", hover=True, raw_attrs=[testid("metrics-table")]):
                    with html.Thead():
                        with html.Tr():
                            html.Th("{{ column }}", v_for="column in metrics_columns", key="column")
                    with html.Tbody():
                        with html.Tr(v_for="(row, index) in metrics_rows", key="index", style="cursor: pointer",
                                     click="enlarged = enlarged === slots[index] ? '' : slots[index]",
                                     classes=("enlarged === slots[index] ? 'bg-blue-lighten-5' : ''",)):
                            html.Td("{{ cell }}", v_for="(cell, column) in row", key="column")
    return layout
