"""Pretraining distillation: a teacher's distributions guide a student during pretraining."""
