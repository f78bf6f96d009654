"""Stream builders. Importing this package registers every built-in stream.

Each builder is a function ``(**args) -> clbench.Stream`` registered by name,
e.g. ``from streams import teacher_student, permuted_mnist``.
"""
from streams.cifar_similarity import similar_cifar100
from streams.permuted import permuted_fashion_mnist, permuted_kmnist, permuted_mnist
from streams.split import split_cifar10, split_cifar100, split_fashion_mnist, split_mnist
from streams.teacher_student import teacher_student

__all__ = ["similar_cifar100", "permuted_fashion_mnist", "permuted_kmnist", "permuted_mnist", "split_cifar10", "split_cifar100",
           "split_fashion_mnist", "split_mnist", "teacher_student"]
