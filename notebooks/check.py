"""Checks an executed notebook: every code cell ran, none printed an error, and the cells
tagged "picture" showed an image."""
import json
import sys

path = sys.argv[1]
nb = json.load(open(path))
problems = []
images = 0
for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
        continue
    src = "".join(cell["source"])
    if cell.get("execution_count") is None:
        problems.append(f"cell {i} did not run")
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            problems.append(f"cell {i}: {out.get('ename')}: {out.get('evalue')}")
        if out.get("output_type") == "stream" and out.get("name") == "stderr":
            text = "".join(out.get("text", ""))
            if "error" in text.lower() or "panicked" in text:
                problems.append(f"cell {i} stderr: {text.strip()[:500]}")
        data = out.get("data", {})
        if "image/png" in data or "<svg" in "".join(data.get("text/html", "")):
            images += 1
# Cells tagged "picture" each promise one image.
expected = sum(1 for c in nb["cells"] if "picture" in c.get("metadata", {}).get("tags", []))
if images < expected:
    problems.append(f"{images} picture(s) shown, expected at least {expected}")
if problems:
    print(f"{path}:")
    for p in problems:
        print("  " + p)
    sys.exit(1)
print(f"{path}: {images} picture(s)")
