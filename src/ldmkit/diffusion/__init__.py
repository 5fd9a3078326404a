"""ldmkit.diffusion"""
