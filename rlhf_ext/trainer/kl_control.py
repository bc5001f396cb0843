"""KL coefficient controllers (Ziegler et al. 2019; TRL's AdaptiveKLController)."""

from __future__ import annotations


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        """Start at ``kl_coef``."""
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Keep the coefficient; return it."""
        return self.value

    def state_dict(self) -> dict:
        """The coefficient, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore the coefficient from :meth:`state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional control of the KL coefficient towards a target KL.

    ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``, where
    ``kl`` is the measured KL (the trainer feeds the batch mean of the
    per-sequence sum of per-token KL) and ``n_steps`` the number of sequences
    the measurement covers.
    """

    def __init__(self, kl_coef: float, target: float, horizon: float) -> None:
        """Start at ``kl_coef``, steering towards ``target`` over ``horizon`` sequences."""
        if target <= 0 or horizon <= 0:
            raise ValueError(
                "rlhf_ext.trainer.AdaptiveKLController: `target` and `horizon` must be > 0, "
                f"got target={target!r}, horizon={horizon!r}"
            )
        super().__init__(kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient by the clipped proportional error; return it."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def build_kl_controller(config) -> FixedKLController:
    """The controller a :class:`PPOConfig` asks for."""
    if config.adaptive_kl:
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKLController(config.kl_coef)
