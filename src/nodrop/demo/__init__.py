"""The bundled demo: a small HTTP app and the `nodrop demo` driver."""
