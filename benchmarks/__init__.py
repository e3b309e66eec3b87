"""Benchmarks for astages against plain arq: ``python -m benchmarks [--quick]``.

Each module measures one target of the performance issue and returns rows for a table;
``__main__`` runs them all, prints the tables and writes ``results.json`` (and the plot
with ``--plot``). Everything runs against Redis database 10 unless ``--redis-url`` says
otherwise, and only ever flushes that one database.
"""
