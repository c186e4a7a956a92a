"""The browser dashboard: its routes and picture previews (``routes``) and the
page's static files (``static/``: index.html, app.css, app.js, favicon.svg),
installed together as package data.
"""
