"""Measurements, at the top of the flow because they run every layer below: the roofline and the memory plan,
measured latency beside the peers (`bench`), accuracy on the embedded question set (`evaluate`, `vtprune eval`),
where Stage 2 loses a description (`stage2_retention`), and flat memory over long generation (`long_generation`).
"""
