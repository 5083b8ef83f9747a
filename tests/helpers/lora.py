"""LoRA weights for the tests."""

import torch


def move_lora(model, std: float) -> None:
    """A trained-looking adapter: PEFT starts every LoRA B at zero (policy = reference, and no gradient reaches A);
    B drawn from N(0, std) after `torch.manual_seed(0)` makes them differ, the same way in every test."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
