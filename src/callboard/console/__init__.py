"""The web console: server-rendered pages over the events service, the bus and the broker's
operations, served by ``callboard serve`` at ``/console`` (``docs/console.md``)."""
