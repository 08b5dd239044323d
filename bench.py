"""
Times the UNet training step alone (cached latents and text embeddings, loss, backward, optimizer step),
side by side with diffusers' UNet2DConditionModel (issue 7). Not written yet.
"""
