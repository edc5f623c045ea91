"""FAS on SCAF: Adam 1e-4, LSGAN weights 75 / 0.002 / 10, frozen AIFR encoder.

Set ``--config.init_from=<AIFR workdir or checkpoint>``.
"""

from configs import common


def get_config():
  c = common.get_config()
  c.train_fr = False
  c.train_fas = True
  return c
