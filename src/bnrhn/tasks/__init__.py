"""Long-range tasks that tell recurrent cells apart: generated data, heads, training and a comparison.

- :mod:`bnrhn.tasks.generators`: the adding problem, the copy task, sequential MNIST (when the digits
  are installed);
- :mod:`bnrhn.tasks.heads`: many-to-one and many-to-many models over the runner, for any cell;
- :mod:`bnrhn.tasks.train`: ``bnrhn tasks train`` as a function (the shared trainer, checkpoints, logs);
- :mod:`bnrhn.tasks.experiment`: ``bnrhn tasks compare`` (cells × lengths × seeds, table, figures).
"""
