"""What server and client share: the installation layout and process titles
(``paths``), the hosts file (``hosts``), settings (``settings``), the token and
TLS contexts (``credentials``), where Radiance is and the environment it needs
(``radiance``), and the HDR/PPM-to-PNG conversion (``png``). Standard library
only, and it imports no other layer of rayserver, so ``rayfront`` starts fast
and the client can never pull in the server.
"""
