"""Other Stable Diffusion tools' files: exporting artifacts to them, importing their LoRAs.

- ``formats``: key names and layouts (kohya/A1111, diffusers, textual-inversion embeddings).
- ``export``: an artifact to kohya, embeddings or diffusers files (``lowmcgm export``).
- ``lora_import``: reading those LoRA files back (``lowmcgm import-lora``, ``lora.init_lora``).
"""
