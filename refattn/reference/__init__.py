"""NumPy reference implementations (float64 inside): the specification."""
