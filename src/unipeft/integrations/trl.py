"""What TRL's trainers need beyond being recognised as a PEFT model (see compat.py for that)."""

from __future__ import annotations


def check_fused_lm_head(peft) -> None:
    """TRL's SFTTrainer patches the base model's forward so that `model(..., fused_lm_head=True)` computes the loss
    from the backbone's hidden states times `lm_head.weight` directly. A delta hooked on the output embedding would
    be skipped (never trained, silently): refuse instead. (TRL refuses HF PEFT's lm_head adapters the same way.)"""
    head = peft.get_base_model().get_output_embeddings()
    hooked = [s.path for s in peft.handle.sites if head is not None and getattr(s, "host", None) is head
              and not getattr(s, "merged", False)]
    if hooked:
        raise ValueError(f"TRL computes the loss from lm_head.weight directly (its fused LM head), so the adapter on "
                         f"the output embedding ({', '.join(hooked)}) would never be trained; remove 'lm_head' from "
                         f"target_modules")
