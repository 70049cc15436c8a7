"""systemd's protocols, spelled exactly: socket activation in (``LISTEN_FDS``)
and out (spawning a child with its fds at 3.. and its own ``LISTEN_PID``), and
``sd_notify`` messages: format, send, receive."""
