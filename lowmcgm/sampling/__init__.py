"""Sampling: an artifact on diffusers' pipelines (``sampler``), pose guidance, prompts and their poses,
and the pictures written for people (``previews``)."""
