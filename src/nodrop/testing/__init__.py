"""Test helpers shipped with nodrop: private network namespaces and fakes of
the OS seams."""
