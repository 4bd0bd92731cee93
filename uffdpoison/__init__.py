"""uffdpoison: a postcopy page server that carries memory poison across live migration."""

__version__ = "0.1.0"
