"""The sender role, in three parts that share nothing but the journal and positions:

- :mod:`engine.sender.intake`: watcher hints -> readiness -> stable reads -> journal (the one owner of
  per-path state, and the only writer of the journal);
- :mod:`engine.sender.link`: one per peer; streams the journal from the receiver's acknowledged position;
- :mod:`engine.sender.reconcile`: compares the source with the receiver's manifest and queues the
  difference in the intake.

:mod:`engine.node` composes them.
"""
