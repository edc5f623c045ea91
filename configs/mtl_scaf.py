"""Joint MTLFace on SCAF: every iteration an AIFR step then a FAS step."""

from configs import common


def get_config():
  c = common.get_config()
  c.train_fr = True
  c.train_fas = True
  return c
