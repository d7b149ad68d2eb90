"""Torch-side pieces the backends share (imported by backends and inference only, never by the
CLI's fast path): the training losses, the fused output head + cross-entropy, the logit rule
of each family, the preference losses and the facts about a loaded model."""
