"""Breast DCE-MRI exam classification with the Doubly Deep CNN (Gong et al., NYU) in Keras 3."""
