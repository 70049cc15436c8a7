"""``nodrop run``: the supervisor that reloads any server without dropping a connection.

Modules, one concept each:

* :mod:`.config` — what to run (command line + TOML), pure;
* :mod:`.model` — generations and workers as plain data;
* :mod:`.listeners` — which sockets each generation gets (the strategy);
* :mod:`.process` — the OS seam: spawning, signalling, reaping;
* :mod:`.output` — workers' stdout/stderr, tagged per worker;
* :mod:`.control` — the control socket (reload, status, stop) and its client;
* :mod:`.supervisor` — the event loop and the reload state machine.
"""
