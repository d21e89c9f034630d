"""UI-format (nodes/links/widgets_values) <-> API-format (POST /prompt) workflows, from ComfyUI's node definitions.

``widgets`` is ``{class_type: [(input name, has control_after_generate), ...]}`` in the order ComfyUI's
frontend lays widgets out (required inputs, then optional, skipping socket-only types).
"""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_layout(node_class) -> tuple[list[tuple[str, bool]], list[tuple[str, str]]]:
    """(widgets in order, socket inputs in order) of a ComfyUI node class."""
    spec = node_class.INPUT_TYPES()
    widgets, sockets = [], []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind = value[0]
            opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
            if is_widget and not opts.get("forceInput"):
                widgets.append((name, bool(opts.get("control_after_generate"))))
                if opts.get("image_upload"):
                    widgets.append(("__upload__", False))
            else:
                sockets.append((name, kind if isinstance(kind, str) else "COMBO"))
    return widgets, sockets


def _widget_defaults(node_class) -> dict:
    spec = node_class.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            out[name] = opts.get("default", value[0][0] if isinstance(value[0], list) and value[0] else None)
    return out


def api_to_ui(api: dict, classes: dict) -> dict:
    nodes, links = [], []
    link_id = 0
    outputs_links: dict[tuple[str, int], list[int]] = {}
    incoming: dict[str, dict[str, int]] = {}
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                link_id += 1
                src, slot = value
                _, sockets = widget_layout(classes[node["class_type"]])
                to_slot = [s for s, _ in sockets].index(name)
                out_type = classes[api[src]["class_type"]].RETURN_TYPES[slot]
                links.append([link_id, int(src), slot, int(node_id), to_slot, out_type])
                outputs_links.setdefault((src, slot), []).append(link_id)
                incoming.setdefault(node_id, {})[name] = link_id
    for i, (node_id, node) in enumerate(api.items()):
        cls = classes[node["class_type"]]
        widgets, sockets = widget_layout(cls)
        values = []
        for name, control in widgets:
            if name == "__upload__":
                values.append("image")
                continue
            values.append(node["inputs"][name])
            if control:
                values.append("fixed")
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [60 + 380 * (i % 4), 80 + 360 * (i // 4)], "size": [340, 200],
            "flags": {}, "order": i, "mode": 0, "title": node.get("_meta", {}).get("title", node["class_type"]),
            "inputs": [{"name": n, "type": t, "link": incoming.get(node_id, {}).get(n)} for n, t in sockets
                       if n in incoming.get(node_id, {})],
            "outputs": [{"name": getattr(cls, "RETURN_NAMES", None)[k] if getattr(cls, "RETURN_NAMES", None) else t, "type": t,
                         "links": outputs_links.get((node_id, k), [])} for k, t in enumerate(cls.RETURN_TYPES)],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": values,
        })
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(ui: dict, classes: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        cls = classes[node["type"]]
        widgets, _ = widget_layout(cls)
        values = list(node.get("widgets_values", []))
        defaults = _widget_defaults(cls)
        inputs = {}
        for name, control in widgets:
            if not values:  # saved before this (trailing, optional) widget existed: the frontend takes its default
                inputs[name] = defaults[name]
                continue
            v = values.pop(0)
            if name == "__upload__":
                continue
            inputs[name] = v
            if control:
                values.pop(0)
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            api[str(node["id"])]["_meta"] = {"title": node["title"]}
    return api
