"""Test helper: make a run stop as on SIGTERM right after a chosen step, without a signal."""


def stop_after(monkeypatch, train, framework_cls, step: int):
  """Replaces the trainer's SIGTERM flag so that the next runs save and return after ``step``.

  The flag is raised once the batch of step ``step - 1`` (index ``step - 2``) is drawn through
  ``framework_cls.sample``; the trainer reads the agreed flag one step later, so the run saves a
  checkpoint after ``step`` and returns ``{"preempted": True, "step": step}``.

  Returns:
    ``disarm()``: later runs are not stopped (to resume).
  """
  drawn, armed = [-1], [True]
  original = framework_cls.sample

  def sample(self, sampler, state, s, *args, **kwargs):
    drawn[0] = s
    return original(self, sampler, state, s, *args, **kwargs)

  class Flag:
    received = "test"

    def __init__(self, *args, **kwargs):
      del args, kwargs

    def install(self):
      return self

    def uninstall(self):
      pass

    @property
    def is_set(self):
      return armed[0] and drawn[0] >= step - 2

  monkeypatch.setattr(framework_cls, "sample", sample)
  monkeypatch.setattr(train.ckpt_lib, "PreemptionFlag", Flag)
  return lambda: armed.__setitem__(0, False)
