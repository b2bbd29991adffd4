"""Image input for InternVL models: safe loading (`image_loading`) and exact tiling
(`image_processing`)."""
