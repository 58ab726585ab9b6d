"""Draw the example images shipped with the UI: `python frontend/examples/make_examples.py` from the repo root."""

from PIL import Image, ImageDraw

# 1: a sunny landscape with a red house, a tree and a blue car
img = Image.new("RGB", (640, 448), (135, 200, 240))
d = ImageDraw.Draw(img)
d.rectangle((0, 300, 640, 448), fill=(90, 170, 80))
d.ellipse((520, 30, 600, 110), fill=(255, 215, 0))
d.rectangle((90, 190, 250, 320), fill=(200, 40, 40))
d.polygon([(75, 190), (170, 110), (265, 190)], fill=(120, 60, 30))
d.rectangle((150, 250, 190, 320), fill=(90, 50, 20))
d.rectangle((340, 200, 365, 320), fill=(110, 70, 30))
d.ellipse((300, 120, 405, 225), fill=(30, 120, 40))
d.rounded_rectangle((430, 300, 600, 360), radius=12, fill=(40, 80, 200))
d.ellipse((450, 345, 490, 385), fill=(30, 30, 30))
d.ellipse((540, 345, 580, 385), fill=(30, 30, 30))
img.save("frontend/examples/house_and_car.png", optimize=True)

# 2: shapes on a table, to count and name colours
img = Image.new("RGB", (512, 512), (245, 240, 230))
d = ImageDraw.Draw(img)
d.ellipse((40, 50, 200, 210), fill=(220, 50, 50))
d.rectangle((290, 60, 460, 230), fill=(50, 90, 220))
d.polygon([(130, 300), (40, 460), (220, 460)], fill=(40, 170, 70))
d.ellipse((300, 300, 380, 380), fill=(250, 200, 30))
d.ellipse((390, 380, 470, 460), fill=(250, 200, 30))
img.save("frontend/examples/coloured_shapes.png", optimize=True)
