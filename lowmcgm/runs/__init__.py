"""A run's folder: making and checking it, what resume compares, never writing over an input,
the effective config written beside the outputs, and stop signals."""
