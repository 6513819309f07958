"""What a person reads: tables, JSON / CSV / Markdown, plots and the HTML report.

Takes plain results (metrics, rows, histories) and writes them; runs nothing.
To add a report section: its data in the report writer, its HTML in the
templates.

Modules: ``formatting`` (numbers as text), ``tables`` (the renderer-neutral
table, drawn with Rich and Markdown), ``html_page`` (the jinja2 templates in
``templates/``), ``report`` (one model's evaluation report), ``policy_report``
(the compare-policies table, from duck-typed rows), ``plots`` (PNGs; imports
matplotlib, so the others import it only when drawing), ``progress`` (training
progress on screen and in TensorBoard). Nothing here imports
:mod:`vtransfer.workflows`.
"""
