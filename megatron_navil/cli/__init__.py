"""Console entry points of the library (navil-demo, navil-pretrain)."""
