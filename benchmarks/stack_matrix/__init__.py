"""The stack matrix: real apps on the servers people deploy, strict clients,
reloads under ``nodrop run`` and under each server's own reload.

* :mod:`stack_matrix.cells`: the table of cells (one dataclass per stack), and
  where each cell's command line is written;
* :mod:`stack_matrix.outcomes`: failure classes and what a client reports;
* :mod:`stack_matrix.httpclients`: ``http.client``, ``httpx`` and ``aiohttp``
  keep-alive clients; :mod:`stack_matrix.wsclient`: WebSocket sessions;
  :mod:`stack_matrix.wrk`: ``wrk`` in close and keep-alive mode;
* :mod:`stack_matrix.launch`: start a cell (under ``nodrop run``, or the server's
  own master for the baseline rows), reload it, stop it;
* :mod:`stack_matrix.exercise`: clients running while the reloads go through;
* :mod:`stack_matrix.table`: the results table.

The apps live in ``tests/stack_apps`` (see ``stackapp.py`` there). The
script ``benchmarks/stacks.py`` runs the matrix; ``tests/test_stacks.py`` is
its short form in CI.
"""
