"""Datasets: generators, Detectron2 registration and mappers; importing registers them."""
