"""The operator's web page: session login (session), what it shows (status_view), its routes
and handlers (status_page), and its HTML, CSS and JavaScript (static/)."""
