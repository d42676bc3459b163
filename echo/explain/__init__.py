"""Why a model decided: saliency maps, their rendering, and valve-energy attribution."""
