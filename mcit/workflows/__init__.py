"""The pipeline's verbs (train, evaluate, analyze, export) and `load`, the one place that wires recipe -> data ->
model -> method. Everything below this layer is a part; everything here puts parts together."""
