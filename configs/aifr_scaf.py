"""AIFR on SCAF (CASIA-WebFace with ages): 36K iterations, warmup 1K, milestones 20K/23K."""

from configs import common


def get_config():
  return common.get_config()
