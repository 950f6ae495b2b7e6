"""What the site shows across capabilities, at the top of the layers: the landing redirect and
dashboard, health and readiness probes, metrics and the API documentation page. (``web`` below
holds only layout, rendering and static assets, and imports no capability.)"""
