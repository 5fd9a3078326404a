"""ldmkit.training"""
