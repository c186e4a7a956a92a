"""A small, generic process supervisor: bind, detach, switch identity, respawn a worker.

It knows nothing of Radiance or HTTP; rayserver plugs its worker in.
"""
