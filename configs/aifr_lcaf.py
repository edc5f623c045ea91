"""AIFR on LCAF (MS1M with ages): 110K iterations, warmup 5K, milestones 70K/90K."""

from configs import common


def get_config():
  c = common.get_config()
  c.num_iter = 110_000
  c.optim.warmup = 5_000
  c.optim.milestone = (70_000, 90_000)
  c.model.num_classes = 85_742  # MS1M-ArcFace identities
  return c
