"""Token routers: score(context, token) in [0, 1], higher = the device's token is more likely
what the cloud model would have said; below the threshold, the cloud supplies the next token.

    confidence   p(token) = softmax(logits)[token]: the draft probability
    entropy      1 - H(softmax(logits)) / log(vocab): how peaked the device's distribution is
    reward       a logistic head on the device model's final hidden state (plus log p(token),
                 the entropy and the top probability), trained to predict whether the cloud
                 model's greedy continuation agrees with the device's token (compared as text,
                 since the tokenizers differ; see routing/train_token.py). Needs the hidden
                 state: `HiddenStateTap` captures it from the device model's forward passes.

In a generation loop (the `assist` mode):

    router = get_token_router("reward")                      # FailSafe-wrapped
    with HiddenStateTap(engine.lm) as tap:
        logits = engine.prefill(prompt_ids)
        while ...:
            tok = int(logits.argmax())
            s = router.score(TokenContext(logits, hidden=tap.last_row()), tok)
            if token_to_cloud(s, threshold): ...ask the cloud for this position...
            logits = engine.step(tok)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .base import TokenContext
from .query import ARTIFACTS


def _logprobs(logits) -> np.ndarray:
    x = np.asarray(logits.detach().double().cpu().numpy() if hasattr(logits, "detach") else logits, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"a token router needs one logits row (1-D), got shape {x.shape}")
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def token_features(logits, token: int) -> tuple[float, float, float]:
    """(log p(token), entropy, top probability) of one logits row."""
    lp = _logprobs(logits)
    p = np.exp(lp)
    return float(lp[int(token)]), float(-(p * lp).sum()), float(p.max())


class ConfidenceRouter:
    name = "confidence"

    def score(self, context: TokenContext, token: int) -> float:
        return float(np.exp(_logprobs(context.logits)[int(token)]))


class EntropyRouter:
    name = "entropy"

    def score(self, context: TokenContext, token: int) -> float:
        lp = _logprobs(context.logits)
        h = float(-(np.exp(lp) * lp).sum())
        return max(0.0, 1.0 - h / math.log(lp.size))


class RewardRouter:
    name = "reward"
    artifact = "reward_head.npz"

    def __init__(self, path: str | Path | None = None) -> None:
        from .linear import LinearHeads, load_npz

        self.path = Path(path) if path else ARTIFACTS / self.artifact
        if not self.path.exists():
            raise FileNotFoundError(
                f"token router 'reward' has no trained head at {self.path}; build it with `tandem route train-token`"
            )
        z = load_npz(self.path)
        self.head = LinearHeads.from_arrays(z)
        self.hidden_size = int(z["meta_hidden_size"])
        self.model_name = str(z["meta_model"])
        self.default_threshold = float(z["meta_threshold"]) if "meta_threshold" in z else 0.5

    def features(self, hidden, logits, token: int) -> np.ndarray:
        h = np.asarray(hidden.detach().float().cpu().numpy() if hasattr(hidden, "detach") else hidden, dtype=np.float64)
        h = h.reshape(-1)
        if h.size != self.hidden_size:
            raise ValueError(
                f"the reward head was trained on {self.model_name}'s hidden states ({self.hidden_size} numbers), got {h.size}"
            )
        return np.concatenate([h, token_features(logits, token)])

    def score(self, context: TokenContext, token: int) -> float:
        if context.hidden is None:
            raise ValueError("the reward router needs the device model's hidden state (TokenContext.hidden)")
        return float(self.head.probs(self.features(context.hidden, context.logits, token)[None])[0, 0])

    def score_rows(self, features: np.ndarray) -> np.ndarray:
        """Scores of many precomputed feature rows (hidden state + token features)."""
        return self.head.probs(features)[:, 0]


def final_norm(model):
    """The module whose output the LM head reads (the final hidden state), for Llama-, Gemma-
    and GPT-style transformers models."""
    for path in ("model.norm", "model.final_layernorm", "transformer.ln_f", "model.decoder.final_layer_norm"):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if mod is not None:
            return mod
    raise ValueError(f"cannot find the final norm of {type(model).__name__}; pass hidden states yourself")


class HiddenStateTap:
    """Keeps the device model's final hidden states from its latest forward pass, without
    changing the engine: a forward hook on the final norm. `last_row()` is the state that
    produced the latest logits row (the one a token is chosen from)."""

    def __init__(self, lm) -> None:
        model = getattr(lm, "model", lm)
        self._handle = final_norm(model).register_forward_hook(self._hook)
        self.last = None  # (positions, hidden) of the latest forward, first sequence of the batch

    def _hook(self, module, inputs, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self.last = out[0].detach() if out.dim() == 3 else out.detach()

    def last_row(self):
        if self.last is None:
            raise RuntimeError("no forward pass seen yet")
        return self.last[-1]

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "HiddenStateTap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ConfidenceRouter", "EntropyRouter", "RewardRouter", "HiddenStateTap", "token_features", "final_norm"]
