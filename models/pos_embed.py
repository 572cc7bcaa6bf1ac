"""Fixed 2-D sin-cos position embeddings in the official MAE/LocalMIM layout.

The first half of the channels encodes the column index, the second half the row index (MAE calls
them emb_h/emb_w, but its grid[0] is the w coordinate); tokens are row-major. Computed in float64
and cast once, which is what makes released checkpoints' pos_embed match ours bit for bit.
"""
import numpy as np


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """[M] positions -> [M, embed_dim]: sines of pos*omega_k then cosines, omega_k = 1e4^(-2k/d)."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """[grid_size**2 (+1), embed_dim] float64; a zero row first when cls_token."""
    assert embed_dim % 4 == 0, f'sin-cos position embedding needs a width divisible by 4, got {embed_dim}'
    coords = np.arange(grid_size, dtype=np.float64)
    cols, rows = np.meshgrid(coords, coords)  # cols varies along a row: token t = r * G + c
    emb = np.concatenate([get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols),
                          get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb
