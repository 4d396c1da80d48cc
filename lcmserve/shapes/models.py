"""The architectures of the shapes family: tokenizer, domain CLIP, VAE, teacher UNet, judge.

Sizes are chosen so that every stage trains on two CPU cores in float32 (bf16 autocast is
emulated, and far slower, on CPUs without AVX-512 BF16 or AMX) in minutes rather than hours,
and the shipped weights (float16 safetensors) stay small enough to live in the package
(tests/shapes/test_shapes_bundle.py holds the limits; docs/shapes.md the measured times).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lcmserve.models.tokenizer import write_clip_tokenizer
from lcmserve.shapes.language import language_words
from lcmserve.shapes.scenes import BACKGROUNDS, CELLS, COLOURS, IMAGE_SIZE, SHAPES, SIZES, vocabulary

# Every caption of the language fits with room to spare (tests/models/test_tokenizer.py); words the
# tokenizer does not know split into letters, so a prompt with a few of them still fits.
MAX_TOKENS = 77  # as CLIP and Stable Diffusion
LATENT_SIZE = 16
TEXT_DIM = 128


def write_tokenizer(folder: str | Path):
    """The domain tokenizer: every caption word is one token."""
    from transformers import CLIPTokenizer

    words = sorted(set(vocabulary()) | set(language_words()))
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(words, folder, model_max_length=MAX_TOKENS))


def carry_text_embeddings(model, old_tokenizer, new_tokenizer, aliases: dict[str, str] | None = None) -> None:
    """Move a trained text tower (``CLIPTextModel`` or ``CLIPModel``) onto a new tokenizer, in place.

    A token both vocabularies hold keeps its embedding. A new word starts from its alias's embedding
    (a synonym the old vocabulary knows: huge -> large) or else from the mean of the pieces the old
    tokenizer split it into, which is what the model read for it before. Positions beyond the old
    maximum start from the last trained one. The config's vocab_size and max_position_embeddings follow.
    """
    aliases = aliases or {}
    from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

    # found by type: where the embeddings sit differs between CLIPModel, CLIPTextModel and transformers 4 / 5
    embeddings = next(m for m in model.modules() if isinstance(m, CLIPTextEmbeddings))
    config = getattr(model.config, "text_config", model.config)
    old = embeddings.token_embedding.weight.detach()
    old_vocab, new_vocab = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    rows = []
    for token, _ in sorted(new_vocab.items(), key=lambda kv: kv[1]):
        if token in old_vocab:
            rows.append(old[old_vocab[token]])
            continue
        word = aliases.get(token.removesuffix("</w>"), token.removesuffix("</w>"))
        ids = old_tokenizer(word, add_special_tokens=False).input_ids
        rows.append(old[ids].mean(0) if ids else old.mean(0))
    token_embedding = nn.Embedding(len(rows), old.shape[1])
    token_embedding.weight.data.copy_(torch.stack(rows))
    positions = embeddings.position_embedding.weight.detach()
    n = new_tokenizer.model_max_length
    position_embedding = nn.Embedding(n, positions.shape[1])
    position_embedding.weight.data.copy_(torch.cat([positions[:n], positions[-1:].expand(max(0, n - len(positions)), -1)]))
    embeddings.token_embedding, embeddings.position_embedding = token_embedding, position_embedding
    embeddings.position_ids = torch.arange(n).expand((1, -1))
    config.vocab_size, config.max_position_embeddings = len(rows), n
    # The special tokens have new ids: the pooled output is read at the end token, found by its id (a stale id
    # pools the start token of every caption, the same vector for all).
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, getattr(new_tokenizer, key))
    for module in model.modules():
        if hasattr(module, "eos_token_id") and isinstance(module.eos_token_id, int):
            module.eos_token_id = new_tokenizer.eos_token_id


def retokenize(model, old_tokenizer, new_tokenizer) -> None:
    """``carry_text_embeddings`` with the language's aliases, when the tokenizers differ at all."""
    from lcmserve.shapes.language import ALIASES

    if (old_tokenizer.get_vocab() != new_tokenizer.get_vocab()
            or old_tokenizer.model_max_length != new_tokenizer.model_max_length):
        carry_text_embeddings(model, old_tokenizer, new_tokenizer, ALIASES)


def clip_config(tokenizer):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=512, num_attention_heads=4,
        num_hidden_layers=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )
    vision = dict(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=128, intermediate_size=512, num_attention_heads=4,
        num_hidden_layers=4, num_channels=3, hidden_act="gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)


def vae_config() -> dict:
    return dict(
        block_out_channels=[16, 32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=16,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        in_channels=3, out_channels=3, sample_size=IMAGE_SIZE,
    )


def unet_config() -> dict:
    return dict(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=[32, 96, 192],
        layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=TEXT_DIM,
        attention_head_dim=8, norm_num_groups=16,
    )


def scheduler_config() -> dict:
    """Stable Diffusion's noise schedule."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


# -- the judge --------------------------------------------------------------------------------
N_CELLS = len(CELLS)
SHAPE_CLASSES = ("empty", *SHAPES)
COLOUR_CLASSES = tuple(COLOURS)
SIZE_CLASSES = tuple(SIZES)
BACKGROUND_CLASSES = tuple(BACKGROUNDS)
CELL_LOGITS = len(SHAPE_CLASSES) + len(COLOUR_CLASSES) + len(SIZE_CLASSES)  # per cell: shape, colour, size


def scene_logits(cells: torch.Tensor, background: torch.Tensor) -> dict[str, torch.Tensor]:
    """The heads of a scene reader: per-cell logits [B, 9, CELL_LOGITS] split by attribute, and the background's."""
    s, c = len(SHAPE_CLASSES), len(COLOUR_CLASSES)
    return {"shape": cells[..., :s], "colour": cells[..., s : s + c], "size": cells[..., s + c :],
            "background": background}


class SceneClassifier(nn.Module):
    """Reads a scene back from pixels: per cell shape-or-empty, colour and size; the background.

    A small CNN with GroupNorm (BatchNorm judges collapse under the slight noise of generated
    images). Colour and size are only scored in cells that hold an object.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.features = nn.Sequential(
            block(3, width, 2), block(width, width, 1), block(width, 2 * width, 2), block(2 * width, 2 * width, 1),
            block(2 * width, 2 * width, 1), nn.AdaptiveAvgPool2d(3),  # one 3x3 map cell per grid cell
        )
        c = 2 * width
        self.cell_head = nn.Conv2d(c, CELL_LOGITS, 1)
        self.background_head = nn.Linear(c, len(BACKGROUND_CLASSES))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: float [B, 3, 64, 64] in [0, 1]. Returns logits per head."""
        f = self.features(images * 2 - 1)
        cells = self.cell_head(f).flatten(2).transpose(1, 2)  # [B, 9, K]
        return scene_logits(cells, self.background_head(f.mean(dim=(2, 3))))
