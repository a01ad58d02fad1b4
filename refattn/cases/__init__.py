"""Registry-driven test cases for kernel ops (inputs on which every kernel of an op is
checked against its reference). Each module here calls
:func:`refattn.testing.register_cases` at import; :mod:`refattn.testing` imports them all
before enumerating cases, so cases live beside nothing else and need no test-file import."""
