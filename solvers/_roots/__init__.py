"""Batched root finders (Newton–Krylov, Anderson mixing) for implicit steps and fixed-point inversion."""
