"""The base model: what it is (``base``), where it comes from (``loading``, ``folder``,
``single_file``, ``tiny``), and whether settings fit it (``fit``)."""
