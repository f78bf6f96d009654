"""Stream builders. Importing this package registers every built-in stream.

Each builder is a function ``(**args) -> clbench.Stream`` registered by name,
e.g. ``from clbench.streams import teacher_student, permuted_mnist``.
"""
from clbench.streams.cifar_similarity import similar_cifar100
from clbench.streams.permuted import (
           permuted_fashion_mnist,
           permuted_kmnist,
           permuted_mnist,
)
from clbench.streams.split import (
           split_cifar10,
           split_cifar100,
           split_fashion_mnist,
           split_mnist,
)
from clbench.streams.teacher_student import teacher_student

__all__ = ["similar_cifar100", "permuted_fashion_mnist", "permuted_kmnist", "permuted_mnist", "split_cifar10", "split_cifar100",
           "split_fashion_mnist", "split_mnist", "teacher_student"]
