"""A procedural world, its episodes, and the project-trained world model that simulates it.

- :mod:`~longroll.world.map`: the toroidal map (biomes, objects, moving animals) from prompt attributes and a
  seed, rendered exactly (integer arithmetic) on any device.
- :mod:`~longroll.world.episode`: camera trajectories driven by discrete actions, with loops and revisits,
  and the bookkeeping of what each frame's tiles were last seen as.
- :mod:`~longroll.world.latents`: the exact space-to-depth "latent" space.
- :mod:`~longroll.world.text`: MiniLM prompt embeddings (stored for the world prompts, live for any other).
- :mod:`~longroll.world.model`: the causal Wan world model with pose-aware RoPE, and its checkpoints.
- :mod:`~longroll.world.training`: diffusion-forcing training on rendered episodes.
- :mod:`~longroll.world.rollout`: rollouts with any cache policy and their fidelity against the ground truth.
"""

from longroll.world.episode import ACTIONS, NUM_ACTIONS, EpisodeConfig, Episodes, sample_episodes, tile_categories
from longroll.world.latents import frames_to_latents, latents_to_frames, latents_to_uint8
from longroll.world.map import NUM_WORLDS, WorldAttributes, all_prompts, render_views
from longroll.world.model import WorldModelSpec, WorldWanModel, load_world_model, save_world_model, world_wan_config
from longroll.world.rollout import WorldRollout, rollout_world, score_rollout
from longroll.world.text import encode_prompts, load_prompt_embeddings

__all__ = [
    "ACTIONS",
    "NUM_ACTIONS",
    "NUM_WORLDS",
    "EpisodeConfig",
    "Episodes",
    "WorldAttributes",
    "WorldModelSpec",
    "WorldRollout",
    "WorldWanModel",
    "all_prompts",
    "encode_prompts",
    "frames_to_latents",
    "latents_to_frames",
    "latents_to_uint8",
    "load_prompt_embeddings",
    "load_world_model",
    "render_views",
    "rollout_world",
    "sample_episodes",
    "save_world_model",
    "score_rollout",
    "tile_categories",
    "world_wan_config",
]
