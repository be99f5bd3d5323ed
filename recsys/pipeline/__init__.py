"""The pipeline that runs a method: build, fit, test (``run``), the stages before a method is built
(``stages``: stored adapters found or trained), several devices and SLURM (``scale``), speed switches
(``speed``) and the loggers (``tracking``)."""
